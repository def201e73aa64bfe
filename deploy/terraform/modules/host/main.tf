# One EC2 host: private IP only, IMDSv2 only, encrypted volumes with the region's key,
# reachable by operators through SSM Session Manager (no SSH, no key pair).

data "aws_ami" "ubuntu" {
  count       = var.ami_id == null ? 1 : 0
  most_recent = true
  owners      = ["099720109477"] # Canonical
  filter {
    name   = "name"
    values = ["ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*"]
  }
  filter {
    name   = "virtualization-type"
    values = ["hvm"]
  }
}

locals {
  ami_id = var.ami_id != null ? var.ami_id : data.aws_ami.ubuntu[0].id
  # Every file this host fetches from Secrets Manager: path on the host => secret name
  # after the cluster's prefix. The certificates it holds (the first is the host's own
  # identity, also host.pem: the [etcd] client certificate of the shared cluster TOML),
  # the CA, and its role's passwords or auth file. The host's role may read exactly these.
  tls_files = length(var.certificates) == 0 ? {} : merge(
    {
      "${var.tls_dir}/ca.pem"       = "ca.pem"
      "${var.tls_dir}/host.pem"     = "${var.certificates[0]}.pem"
      "${var.tls_dir}/host-key.pem" = "${var.certificates[0]}-key.pem"
    },
    { for c in var.certificates : "${var.tls_dir}/${c}.pem" => "${c}.pem" },
    { for c in var.certificates : "${var.tls_dir}/${c}-key.pem" => "${c}-key.pem" },
  )
  secret_files = merge(local.tls_files, var.secret_files)
  setup_script = templatefile("${path.module}/setup.sh.tftpl", {
    name           = var.name
    role           = var.role
    service_user   = var.service_user
    data_dir       = var.data_dir
    data_volume    = var.data_volume_gb > 0
    fetch_secrets  = length(local.secret_files) > 0
    secret_files   = local.secret_files
    secrets        = var.secrets
    install_xdc    = var.install_xdc
    xdc_package    = var.xdc_package
    pip_index_args = var.xdc_index_url == "" ? "" : "--index-url ${var.xdc_index_url}"
    role_script    = var.role_script
    units          = var.units
  })
  user_data = templatefile("${path.module}/cloud-init.yaml.tftpl", {
    name         = var.name
    role         = var.role
    files        = var.files
    setup_script = local.setup_script
  })
}

# This host's own role: it may read the secrets it fetches and no other host's.
module "iam" {
  source = "../iam"

  name         = var.name
  secret_arns  = [for s in sort(distinct(values(local.secret_files))) : "${var.secrets.arn_prefix}${s}-??????"]
  kms_key_arns = var.secrets.kms_key_arns
  tags         = var.tags
}

resource "aws_instance" "this" {
  ami                         = local.ami_id
  instance_type               = var.instance_type
  subnet_id                   = var.subnet_id
  private_ip                  = var.private_ip
  vpc_security_group_ids      = var.security_group_ids
  iam_instance_profile        = module.iam.instance_profile_name
  associate_public_ip_address = false
  ebs_optimized               = true
  monitoring                  = true
  user_data                   = local.user_data
  # A changed config must not silently replace a store node (and its place in the
  # quorum); operators roll config changes with the drill-tested procedure instead.
  user_data_replace_on_change = false

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
  }

  root_block_device {
    volume_type           = "gp3"
    volume_size           = var.root_volume_gb
    encrypted             = true
    kms_key_id            = var.kms_key_arn
    delete_on_termination = true
  }

  tags        = merge(var.tags, { Name = var.name, Role = var.role })
  volume_tags = merge(var.tags, { Name = "${var.name}-root", Role = var.role })

  lifecycle {
    # A newer AMI must not replace a running member: roll them one at a time.
    ignore_changes = [ami, user_data]
  }
}

resource "aws_ebs_volume" "data" {
  count             = var.data_volume_gb > 0 ? 1 : 0
  availability_zone = var.availability_zone
  size              = var.data_volume_gb
  type              = "gp3"
  iops              = var.data_volume_iops
  throughput        = 125 # the gp3 baseline, included in its price
  encrypted         = true
  kms_key_id        = var.kms_key_arn
  tags              = merge(var.tags, { Name = "${var.name}-data", Role = var.role })
}

resource "aws_volume_attachment" "data" {
  count       = var.data_volume_gb > 0 ? 1 : 0
  device_name = "/dev/sdf" # shows up as NVMe; setup.sh takes the EBS disk that is not root
  volume_id   = aws_ebs_volume.data[0].id
  instance_id = aws_instance.this.id
}
