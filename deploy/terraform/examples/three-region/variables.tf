variable "cluster_name" {
  description = "Name of the xdc cluster: etcd prefix \"/<cluster_name>/\", prefix of every AWS resource name."
  type        = string
  default     = "xdc-prod"
  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{0,30}$", var.cluster_name))
    error_message = "cluster_name must be 1-31 lowercase letters, digits or '-' (it prefixes IAM and KMS names)."
  }
}

variable "regions" {
  description = "The three regions, in provider order (aws.r0, aws.r1, aws.r2): xdc region name, AWS region, VPC CIDR (non-overlapping) and the availability zones used."
  type = list(object({
    name               = string
    aws_region         = string
    vpc_cidr           = string
    availability_zones = list(string)
  }))
  default = [
    { name = "use1", aws_region = "us-east-1", vpc_cidr = "10.40.0.0/16", availability_zones = ["us-east-1a", "us-east-1b"] },
    { name = "use2", aws_region = "us-east-2", vpc_cidr = "10.41.0.0/16", availability_zones = ["us-east-2a", "us-east-2b"] },
    { name = "usw2", aws_region = "us-west-2", vpc_cidr = "10.42.0.0/16", availability_zones = ["us-west-2a", "us-west-2b"] },
  ]
  validation {
    condition     = length(var.regions) == 3
    error_message = "This example has exactly three regions (one aliased provider each)."
  }
  validation {
    condition     = length(distinct([for r in var.regions : r.aws_region])) == length(var.regions) && length(distinct([for r in var.regions : r.name])) == length(var.regions)
    error_message = "Regions must be distinct: no AWS region or xdc region name twice."
  }
  validation {
    condition     = alltrue([for r in var.regions : can(regex("^[a-z0-9][a-z0-9-]{0,15}$", r.name))])
    error_message = "xdc region names must be 1-16 lowercase letters, digits or '-'."
  }
  validation {
    condition = alltrue([for r in var.regions : can(cidrhost(r.vpc_cidr, 0)) && try(tonumber(split("/", r.vpc_cidr)[1]) <= 16, false)])
    # Subnets are carved 8 bits smaller (a /16 gives /24s) and etcd members sit at host .100+.
    error_message = "Every vpc_cidr must be a valid IPv4 CIDR of /16 or larger."
  }
  validation {
    condition     = length(distinct([for r in var.regions : r.vpc_cidr])) == length(var.regions)
    error_message = "VPC CIDRs must differ between regions (they are peered)."
  }
  validation {
    condition     = alltrue([for r in var.regions : length(r.availability_zones) >= 1 && length(r.availability_zones) <= 6 && alltrue([for az in r.availability_zones : startswith(az, r.aws_region)])])
    error_message = "Each region lists 1-6 availability zones of its own AWS region."
  }
}

variable "client_cidrs" {
  description = "Networks of the clients (trading desks, colocation, market-data consumers, reached over Direct Connect or VPN). Only they reach the client API and the order gateway."
  type        = list(string)
  default     = ["10.200.0.0/16"]
  validation {
    condition     = length(var.client_cidrs) > 0 && alltrue([for c in var.client_cidrs : can(cidrhost(c, 0)) && !contains(["0.0.0.0/0", "::/0"], c)])
    error_message = "client_cidrs must be valid IPv4 CIDR blocks and must not be 0.0.0.0/0."
  }
}

variable "store_nodes" {
  description = "Store nodes: id (unique), xdc region, voter (false: non-voting standby, an asynchronous DR copy), availability zone index within the region."
  type = list(object({
    id       = string
    region   = string
    voter    = bool
    az_index = optional(number, 0)
  }))
  default = [
    { id = "use1-a", region = "use1", voter = true, az_index = 0 },
    { id = "use2-a", region = "use2", voter = true, az_index = 0 },
    { id = "usw2-a", region = "usw2", voter = true, az_index = 0 },
    { id = "use1-dr", region = "use1", voter = false, az_index = 1 },
  ]
  validation {
    condition     = length([for n in var.store_nodes : n if n.voter]) % 2 == 1
    error_message = "The number of voters must be odd (3 or 5): an even number tolerates no more failures than one fewer."
  }
  validation {
    condition     = length(distinct([for n in var.store_nodes : n.id])) == length(var.store_nodes)
    error_message = "Store node ids must be unique."
  }
  validation {
    condition     = alltrue([for n in var.store_nodes : can(regex("^[a-z0-9][a-z0-9-]{0,30}$", n.id))])
    error_message = "Store node ids must be 1-31 lowercase letters, digits or '-'."
  }
  validation {
    # try(): HCL does not short-circuit &&, and [0] fails for an undeclared region.
    condition     = alltrue([for n in var.store_nodes : try(n.az_index >= 0 && n.az_index < length([for r in var.regions : r.availability_zones if r.name == n.region][0]), false)])
    error_message = "Every store node must name a declared region and one of its availability zones."
  }
  validation {
    # No region may hold a majority of the voters, or losing it loses the quorum.
    condition     = alltrue([for r in var.regions : length([for n in var.store_nodes : n if n.voter && n.region == r.name]) * 2 < length([for n in var.store_nodes : n if n.voter])])
    error_message = "No single region may hold a majority of the voters: the cluster must survive losing one region."
  }
}

variable "engine_hosts" {
  description = "Matching engine hosts: id (unique), engine group (hot and warm replicas share one), xdc region, availability zone index."
  type = list(object({
    id       = string
    group    = string
    region   = string
    az_index = optional(number, 0)
  }))
  default = [
    { id = "eng-a-use1", group = "equities", region = "use1", az_index = 1 },
    { id = "eng-a-use2", group = "equities", region = "use2", az_index = 1 },
  ]
  validation {
    condition     = length(distinct([for e in var.engine_hosts : e.id])) == length(var.engine_hosts)
    error_message = "Engine host ids must be unique."
  }
  validation {
    condition     = alltrue([for e in var.engine_hosts : can(regex("^[a-z0-9][a-z0-9-]{0,30}$", e.id)) && can(regex("^[a-z0-9][a-z0-9-]{0,30}$", e.group))])
    error_message = "Engine ids and groups must be 1-31 lowercase letters, digits or '-'."
  }
  validation {
    # try(): HCL does not short-circuit &&, and [0] fails for an undeclared region.
    condition     = alltrue([for e in var.engine_hosts : try(e.az_index >= 0 && e.az_index < length([for r in var.regions : r.availability_zones if r.name == e.region][0]), false)])
    error_message = "Every engine host must name a declared region and one of its availability zones."
  }
  validation {
    # Each host holds certificates (and fetches their secrets) by these names, the
    # gateway's as "<engine id>-gw": a name used twice would hand one host another's key.
    condition = length(distinct(concat([for n in var.store_nodes : n.id], [for e in var.engine_hosts : e.id],
      [for e in var.engine_hosts : "${e.id}-gw"], [for m in var.etcd_members : m.name], ["admin"]
    ))) == length(var.store_nodes) + 2 * length(var.engine_hosts) + length(var.etcd_members) + 1
    error_message = "Store node ids, engine ids, their gateways (\"<engine id>-gw\"), etcd member names and \"admin\" name certificates: they must all differ."
  }
  validation {
    # "<name>-key.pem" is the key file of certificate <name>, ca.pem the CA's; etcd takes a
    # certificate's name as its user when no password is sent.
    condition     = alltrue([for n in concat([for n in var.store_nodes : n.id], [for e in var.engine_hosts : e.id], [for m in var.etcd_members : m.name]) : !endswith(n, "-key") && !contains(["ca", "root", "${var.cluster_name}-node"], n)])
    error_message = "No store node id, engine id or etcd member name may end in \"-key\" or be \"ca\", \"root\" or \"<cluster_name>-node\" (etcd's users)."
  }
}

variable "etcd_members" {
  description = "etcd members: name (unique), xdc region, availability zone index. 3 or 5, spread so that no region holds a majority."
  type = list(object({
    name     = string
    region   = string
    az_index = optional(number, 0)
  }))
  default = [
    { name = "etcd-use1", region = "use1", az_index = 0 },
    { name = "etcd-use2", region = "use2", az_index = 0 },
    { name = "etcd-usw2", region = "usw2", az_index = 0 },
  ]
  validation {
    condition     = contains([3, 5], length(var.etcd_members))
    error_message = "Run 3 or 5 etcd members."
  }
  validation {
    condition     = length(distinct([for m in var.etcd_members : m.name])) == length(var.etcd_members) && alltrue([for m in var.etcd_members : can(regex("^[a-z0-9][a-z0-9-]{0,30}$", m.name))])
    error_message = "etcd member names must be unique, 1-31 lowercase letters, digits or '-'."
  }
  validation {
    # try(): HCL does not short-circuit &&, and [0] fails for an undeclared region.
    condition     = alltrue([for m in var.etcd_members : try(m.az_index >= 0 && m.az_index < length([for r in var.regions : r.availability_zones if r.name == m.region][0]), false)])
    error_message = "Every etcd member must name a declared region and one of its availability zones."
  }
  validation {
    condition     = alltrue([for r in var.regions : length([for m in var.etcd_members : m if m.region == r.name]) * 2 < length(var.etcd_members)])
    error_message = "No single region may hold a majority of the etcd members: etcd must survive losing one region."
  }
}

variable "failover" {
  description = "\"manual\" (new systems): a lost leader is replaced only when an operator runs `xdc cluster promote REGION`; \"automatic\": elections happen by themselves."
  type        = string
  default     = "manual"
  validation {
    condition     = contains(["manual", "automatic"], var.failover)
    error_message = "failover must be \"manual\" or \"automatic\"."
  }
}

variable "lease_ttl_s" {
  description = "etcd lease TTL of the leader key (whole seconds): how long a dead leader region holds the writes before another region may take over. It must exceed etcd's minimum TTL, 1.5 election timeouts. To outlast the loss of etcd's leader (a rolling etcd upgrade, one etcd host lost) instead of failing the store over, it needs about 4 election timeouts plus 4 heartbeats (one election, another after a split vote): the check lease_outlasts_an_etcd_election warns at plan time otherwise. 5 s does with the default 100/1000 ms; a shorter lease trades that for a faster region failover."
  type        = number
  default     = 5
  validation {
    condition     = var.lease_ttl_s >= 1 && floor(var.lease_ttl_s) == var.lease_ttl_s && var.lease_ttl_s * 1000 >= 1.5 * var.etcd_election_timeout_ms
    error_message = "lease_ttl_s must be a whole number of seconds and at least 1.5 x etcd_election_timeout_ms (etcd raises shorter TTLs silently)."
  }
}

variable "etcd_version" {
  description = "etcd release installed on the members, pinned. 3.5.6 or newer (3.5.0-3.5.2 can lose data after a crash; 3.5.6 is the minimum recommended)."
  type        = string
  default     = "3.5.33"
  validation {
    condition     = can(regex("^3\\.(5\\.([6-9]|[1-9][0-9])|([6-9]|[1-9][0-9])\\.[0-9]+)$", var.etcd_version))
    error_message = "etcd_version must be 3.5.6 or newer, as X.Y.Z."
  }
}

variable "etcd_sha256" {
  description = "SHA-256 of etcd-v<etcd_version>-linux-amd64.tar.gz (from the release's SHA256SUMS). Change it together with etcd_version."
  type        = string
  default     = "5025b5b24d81a9616b6e284ccd439b9a3df055ef8fdcdc142af3ec8f6a3b3c95"
  validation {
    condition     = can(regex("^[0-9a-f]{64}$", var.etcd_sha256))
    error_message = "etcd_sha256 must be 64 lowercase hex digits."
  }
}

variable "etcd_download_base_url" {
  description = "Where the hosts download etcd releases from; point it at an internal mirror to avoid internet downloads."
  type        = string
  default     = "https://github.com/etcd-io/etcd/releases/download"
  validation {
    condition     = startswith(var.etcd_download_base_url, "https://")
    error_message = "etcd_download_base_url must be an https:// URL."
  }
}

variable "etcd_heartbeat_ms" {
  description = "etcd heartbeat interval (ms): about the largest round trip between members (us-east-1 to us-west-2 is ~65 ms)."
  type        = number
  default     = 100
  validation {
    condition     = var.etcd_heartbeat_ms >= 10 && var.etcd_heartbeat_ms <= 5000
    error_message = "etcd_heartbeat_ms must be between 10 and 5000."
  }
}

variable "etcd_election_timeout_ms" {
  description = "etcd election timeout (ms): at least 5 heartbeats (etcd's guidance is about 10)."
  type        = number
  default     = 1000
  validation {
    condition     = var.etcd_election_timeout_ms >= 5 * var.etcd_heartbeat_ms && var.etcd_election_timeout_ms <= 50000
    error_message = "etcd_election_timeout_ms must be at least 5 x etcd_heartbeat_ms and at most 50000."
  }
}

variable "tiers" {
  description = "Degradation tiers in recovery order (tier 0 recovers first and is never shed): name and services."
  type = list(object({
    name     = string
    services = list(string)
  }))
  default = [
    { name = "ledger", services = ["leader", "replication", "append"] },
    { name = "matching", services = ["engine"] },
    { name = "order-entry", services = ["gateway.submit", "gateway.cancel"] },
    { name = "market-data", services = ["subscribe", "book"] },
    { name = "analytics", services = ["read-all", "history", "trace-export"] },
  ]
  validation {
    condition     = length(var.tiers) > 0 && length(distinct([for t in var.tiers : t.name])) == length(var.tiers) && length(distinct(flatten([for t in var.tiers : t.services]))) == length(flatten([for t in var.tiers : t.services]))
    error_message = "Tiers need unique names, and each service belongs to exactly one tier."
  }
}

variable "secrets" {
  description = "Where the secrets are (create them outside Terraform, see the README; only their names and ARNs enter the state): Secrets Manager region (empty: the first region's), name prefix (empty: \"<cluster_name>/\"), customer-managed KMS keys encrypting them (empty: the AWS-managed key). Names: <prefix>ca.pem, <prefix><name>.pem and <prefix><name>-key.pem per certificate (output certificates), <prefix>etcd-root.password, <prefix>etcd-node.password, and <prefix>auth.toml with client_auth."
  type = object({
    region       = optional(string, "")
    prefix       = optional(string, "")
    kms_key_arns = optional(list(string), [])
  })
  default = {}
  validation {
    condition     = can(regex("^([a-z]{2}(-[a-z]+)+-[0-9])?$", var.secrets.region)) && can(regex("^[A-Za-z0-9/_+=.@-]{0,200}$", var.secrets.prefix))
    error_message = "secrets.region must be an AWS region name (or empty), secrets.prefix at most 200 characters of letters, digits and /_+=.@-."
  }
}

variable "client_auth" {
  description = "Clients authenticate and are checked against an auth file (principals by token hash or certificate identity, grants; see the README): secret <prefix>auth.toml, fetched by store and engine hosts. false: every caller with a certificate of the CA may do anything."
  type        = bool
  default     = true
}

variable "client_certs" {
  description = "Whether the store's client API demands a client certificate signed by the cluster's CA (false: server-only TLS there, clients authenticate with tokens)."
  type        = bool
  default     = true
}

variable "exchange_file" {
  description = "The exchange file (engine groups, symbols, opening deposits) the gateways route by; run `xdc exchange init --exchange FILE` once against the cluster."
  type        = string
  default     = "exchange.toml"
}

variable "xdc_package" {
  description = "pip requirement for xdc, pinned to one version."
  type        = string
  default     = "xdc==0.1.0"
  validation {
    condition     = can(regex("^xdc(\\[[a-z,]+\\])?==[0-9][0-9A-Za-z.+-]*$", var.xdc_package))
    error_message = "xdc_package must pin one version, e.g. \"xdc==0.1.0\"."
  }
}

variable "xdc_index_url" {
  description = "Package index serving xdc and its dependencies (your internal mirror); empty: pip's default index."
  type        = string
  default     = ""
  validation {
    condition     = var.xdc_index_url == "" || startswith(var.xdc_index_url, "https://")
    error_message = "xdc_index_url must be empty or an https:// URL."
  }
}

variable "ports" {
  description = "TCP ports: client (store client API), peer (replication), engine (engine internal), gateway (order gateway), etcd_client, etcd_peer."
  type = object({
    client      = optional(number, 7000)
    peer        = optional(number, 7100)
    engine      = optional(number, 7200)
    gateway     = optional(number, 7300)
    etcd_client = optional(number, 2379)
    etcd_peer   = optional(number, 2380)
  })
  default = {}
  validation {
    condition     = alltrue([for p in values(var.ports) : p >= 1024 && p <= 65535]) && length(distinct(values(var.ports))) == length(values(var.ports))
    error_message = "Ports must be distinct and in 1024-65535."
  }
}

variable "instance_types" {
  description = "EC2 instance types of store nodes, engine hosts and etcd members."
  type = object({
    store  = optional(string, "m6i.large")
    engine = optional(string, "c6i.large")
    etcd   = optional(string, "t3.medium")
  })
  default = {}
}

variable "root_volume_gb" {
  description = "Root volume of every host (GiB)."
  type        = number
  default     = 20
  validation {
    condition     = var.root_volume_gb >= 8
    error_message = "root_volume_gb must be at least 8."
  }
}

variable "store_data_volume_gb" {
  description = "gp3 data volume of each store node (GiB): the LMDB log."
  type        = number
  default     = 200
  validation {
    condition     = var.store_data_volume_gb >= 10
    error_message = "store_data_volume_gb must be at least 10."
  }
}

variable "store_data_volume_iops" {
  description = "Provisioned IOPS of each store node's data volume (3000 is included in the gp3 price; group commit keeps fsyncs per second low)."
  type        = number
  default     = 3000
  validation {
    condition     = var.store_data_volume_iops >= 3000 && var.store_data_volume_iops <= 16000
    error_message = "store_data_volume_iops must be between 3000 and 16000."
  }
}

variable "etcd_data_volume_gb" {
  description = "gp3 data volume of each etcd member (GiB)."
  type        = number
  default     = 20
  validation {
    condition     = var.etcd_data_volume_gb >= 8
    error_message = "etcd_data_volume_gb must be at least 8."
  }
}

variable "flow_log_retention_days" {
  description = "Retention of the VPC flow logs (days)."
  type        = number
  default     = 365
}

variable "tags" {
  description = "Tags added to every resource (through the providers' default_tags)."
  type        = map(string)
  default     = { Project = "xdc", ManagedBy = "terraform" }
}
