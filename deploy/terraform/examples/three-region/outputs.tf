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

output "certificates" {
  description = "Every certificate the hosts hold: name => role (identity xdc://<cluster>/<role>/<name>) and the private IP it must name. Each name is one host's: a store node, an engine, a gateway (\"<engine id>-gw\", on its engine host) or an etcd member."
  value       = local.certificates
}

output "certs_init_command" {
  description = "The `xdc certs init` command that issues every certificate above (and an operator's `admin`) with its host's IP as a server name; or issue the same shape with your own CA."
  value       = local.certs_init_command
}

output "secret_names" {
  description = "The Secrets Manager secrets to create before the hosts boot (region: secrets.region, default the first region's): file => secret name. ca-key.pem is never one of them."
  value = merge(
    { "ca.pem" = "${local.secret_prefix}ca.pem" },
    { for name, c in local.certificates : "${name}.pem" => "${local.secret_prefix}${name}.pem" },
    { for name, c in local.certificates : "${name}-key.pem" => "${local.secret_prefix}${name}-key.pem" },
    { for f in distinct(concat(values(local.node_secret_files), values(local.etcd_bootstrap_secret_files))) : f => "${local.secret_prefix}${f}" },
  )
}
