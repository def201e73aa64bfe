output "instance_profile_name" {
  description = "Instance profile every host uses."
  value       = aws_iam_instance_profile.this.name
}

output "role_arn" {
  description = "ARN of the hosts' role (grant it access to anything else the hosts need)."
  value       = aws_iam_role.this.arn
}
