output "vpc_id" {
  description = "VPC of the region."
  value       = module.network.vpc_id
}

output "private_route_table_id" {
  description = "Private route table of the region (peering routes go here)."
  value       = module.network.private_route_table_id
}

output "nat_public_ip" {
  description = "Public IP of the region's outbound traffic."
  value       = module.network.nat_public_ip
}

output "store_nodes" {
  description = "Store nodes of the region: id => instance, client endpoint, data volume."
  value = { for id, n in module.store : id => {
    instance_id     = n.instance_id
    client_endpoint = n.client_endpoint
    data_volume_id  = n.data_volume_id
  } }
}

output "engine_hosts" {
  description = "Engine hosts of the region: id => instance, order gateway endpoint."
  value = { for id, e in module.engine : id => {
    instance_id      = e.instance_id
    gateway_endpoint = e.gateway_endpoint
  } }
}

output "etcd_members" {
  description = "etcd members of the region: name => instance, client endpoint."
  value = { for name, m in module.etcd : name => {
    instance_id     = m.instance_id
    client_endpoint = m.client_endpoint
  } }
}
