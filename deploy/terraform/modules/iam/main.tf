# One role for every host of the cluster: Session Manager access for operators (instead
# of SSH) and read access to exactly the TLS secrets, nothing else.

data "aws_partition" "current" {}

data "aws_iam_policy_document" "assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "this" {
  name               = var.name
  assume_role_policy = data.aws_iam_policy_document.assume.json
  tags               = var.tags
}

resource "aws_iam_role_policy_attachment" "ssm" {
  role       = aws_iam_role.this.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

data "aws_iam_policy_document" "tls" {
  statement {
    sid       = "ReadTlsMaterial"
    actions   = ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"]
    resources = var.tls_secret_arns
  }
  dynamic "statement" {
    for_each = length(var.tls_kms_key_arns) > 0 ? [1] : []
    content {
      sid       = "DecryptTlsMaterial"
      actions   = ["kms:Decrypt"]
      resources = var.tls_kms_key_arns
      condition {
        test     = "StringLike"
        variable = "kms:ViaService"
        values   = ["secretsmanager.*.amazonaws.com"]
      }
    }
  }
}

resource "aws_iam_role_policy" "tls" {
  name   = "read-tls-secrets"
  role   = aws_iam_role.this.id
  policy = data.aws_iam_policy_document.tls.json
}

resource "aws_iam_instance_profile" "this" {
  name = var.name
  role = aws_iam_role.this.name
  tags = var.tags
}
