# Security groups of one region. Cross-region peers cannot reference each other's groups,
# so internal ports are opened to the cluster's VPC CIDRs (var.cluster_cidrs) and the
# client-facing ports to the declared client CIDRs (var.client_cidrs). No ingress rule
# anywhere uses 0.0.0.0/0; there is no SSH (operators use SSM Session Manager).
# Egress to the internet is limited to HTTP(S), for the bootstrap downloads via NAT.

resource "aws_security_group" "store" {
  #checkov:skip=CKV2_AWS_5: attached to the store instances in modules/host through modules/region; checkov's graph does not follow module outputs that deep. Each region gets all three groups so hosts of any kind can be added without a network change.
  name        = "${var.name}-store"
  description = "xdc store nodes: client API from clients and the cluster, replication from the cluster"
  vpc_id      = var.vpc_id
  tags        = merge(var.tags, { Name = "${var.name}-store" })

  ingress {
    description = "xdc client API from declared client networks"
    protocol    = "tcp"
    from_port   = var.ports.client
    to_port     = var.ports.client
    cidr_blocks = var.client_cidrs
  }
  ingress {
    description = "xdc client API from the cluster (engines, followers redirecting clients)"
    protocol    = "tcp"
    from_port   = var.ports.client
    to_port     = var.ports.client
    cidr_blocks = var.cluster_cidrs
  }
  ingress {
    description = "xdc replication from the cluster's store nodes"
    protocol    = "tcp"
    from_port   = var.ports.peer
    to_port     = var.ports.peer
    cidr_blocks = var.cluster_cidrs
  }
  egress {
    description = "cluster-internal traffic (replication, etcd)"
    protocol    = "tcp"
    from_port   = 0
    to_port     = 65535
    cidr_blocks = var.cluster_cidrs
  }
  egress {
    description = "HTTPS for bootstrap downloads and AWS APIs (SSM, Secrets Manager) via NAT"
    protocol    = "tcp"
    from_port   = 443
    to_port     = 443
    cidr_blocks = ["0.0.0.0/0"]
  }
  egress {
    description = "HTTP for OS package mirrors via NAT"
    protocol    = "tcp"
    from_port   = 80
    to_port     = 80
    cidr_blocks = ["0.0.0.0/0"]
  }
}

resource "aws_security_group" "engine" {
  #checkov:skip=CKV2_AWS_5: attached to the engine instances in modules/host through modules/region; checkov's graph does not follow module outputs that deep. Each region gets all three groups so hosts of any kind can be added without a network change.
  name        = "${var.name}-engine"
  description = "xdc matching engine hosts: order gateway from clients, engine port from the cluster"
  vpc_id      = var.vpc_id
  tags        = merge(var.tags, { Name = "${var.name}-engine" })

  ingress {
    description = "order gateway from declared client networks"
    protocol    = "tcp"
    from_port   = var.ports.gateway
    to_port     = var.ports.gateway
    cidr_blocks = var.client_cidrs
  }
  ingress {
    description = "engine internal port (hot-warm handover, health) from the cluster"
    protocol    = "tcp"
    from_port   = var.ports.engine
    to_port     = var.ports.engine
    cidr_blocks = var.cluster_cidrs
  }
  egress {
    description = "cluster-internal traffic (store client API, etcd)"
    protocol    = "tcp"
    from_port   = 0
    to_port     = 65535
    cidr_blocks = var.cluster_cidrs
  }
  egress {
    description = "HTTPS for bootstrap downloads and AWS APIs via NAT"
    protocol    = "tcp"
    from_port   = 443
    to_port     = 443
    cidr_blocks = ["0.0.0.0/0"]
  }
  egress {
    description = "HTTP for OS package mirrors via NAT"
    protocol    = "tcp"
    from_port   = 80
    to_port     = 80
    cidr_blocks = ["0.0.0.0/0"]
  }
}

resource "aws_security_group" "etcd" {
  #checkov:skip=CKV2_AWS_5: attached to the etcd instances in modules/host through modules/region; checkov's graph does not follow module outputs that deep. Each region gets all three groups so hosts of any kind can be added without a network change.
  name        = "${var.name}-etcd"
  description = "etcd members: client and peer ports from the cluster only"
  vpc_id      = var.vpc_id
  tags        = merge(var.tags, { Name = "${var.name}-etcd" })

  ingress {
    description = "etcd client API from the cluster (store nodes, engines, operators' tools)"
    protocol    = "tcp"
    from_port   = var.ports.etcd_client
    to_port     = var.ports.etcd_client
    cidr_blocks = var.cluster_cidrs
  }
  ingress {
    description = "etcd peer traffic from the other members"
    protocol    = "tcp"
    from_port   = var.ports.etcd_peer
    to_port     = var.ports.etcd_peer
    cidr_blocks = var.cluster_cidrs
  }
  egress {
    description = "etcd peer traffic to the other members"
    protocol    = "tcp"
    from_port   = var.ports.etcd_peer
    to_port     = var.ports.etcd_peer
    cidr_blocks = var.cluster_cidrs
  }
  egress {
    description = "HTTPS for the etcd release download and AWS APIs via NAT"
    protocol    = "tcp"
    from_port   = 443
    to_port     = 443
    cidr_blocks = ["0.0.0.0/0"]
  }
  egress {
    description = "HTTP for OS package mirrors via NAT"
    protocol    = "tcp"
    from_port   = 80
    to_port     = 80
    cidr_blocks = ["0.0.0.0/0"]
  }
}
