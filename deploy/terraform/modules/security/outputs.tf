output "store_sg_id" {
  description = "Security group of the store nodes."
  value       = aws_security_group.store.id
}

output "engine_sg_id" {
  description = "Security group of the engine hosts."
  value       = aws_security_group.engine.id
}

output "etcd_sg_id" {
  description = "Security group of the etcd members."
  value       = aws_security_group.etcd.id
}
