output "client_endpoints" {
  description = "Client API endpoints (host:port) per xdc region: give these to clients; followers redirect writes to the leader."
  value = {
    (var.regions[0].name) = [for n in values(module.region_0.store_nodes) : n.client_endpoint]
    (var.regions[1].name) = [for n in values(module.region_1.store_nodes) : n.client_endpoint]
    (var.regions[2].name) = [for n in values(module.region_2.store_nodes) : n.client_endpoint]
  }
}

output "gateway_endpoints" {
  description = "Order gateway endpoints (host:port) per xdc region."
  value = {
    (var.regions[0].name) = [for e in values(module.region_0.engine_hosts) : e.gateway_endpoint]
    (var.regions[1].name) = [for e in values(module.region_1.engine_hosts) : e.gateway_endpoint]
    (var.regions[2].name) = [for e in values(module.region_2.engine_hosts) : e.gateway_endpoint]
  }
}

output "etcd_endpoints" {
  description = "etcd client endpoints (host:port), as written into the cluster config."
  value       = local.etcd_endpoints
}

output "store_nodes" {
  description = "Every store node: id => region, voter, instance, client endpoint, data volume (what `xdc drill` targets)."
  value = merge([for r, nodes in {
    (var.regions[0].name) = module.region_0.store_nodes
    (var.regions[1].name) = module.region_1.store_nodes
    (var.regions[2].name) = module.region_2.store_nodes
    } : { for id, n in nodes : id => merge(n, {
      region = r
      voter  = one([for m in local.cluster_members : m.voter if m.id == id])
  }) }]...)
}

output "nat_public_ips" {
  description = "Public IPs the hosts' downloads come from, per region (for allow-lists on internal mirrors)."
  value = {
    (var.regions[0].name) = module.region_0.nat_public_ip
    (var.regions[1].name) = module.region_1.nat_public_ip
    (var.regions[2].name) = module.region_2.nat_public_ip
  }
}

output "cluster_toml" {
  description = "The cluster configuration written to /etc/xdc/cluster.toml on every host (use it with `xdc cluster status --config`)."
  value       = module.cluster_config.cluster_toml
}
