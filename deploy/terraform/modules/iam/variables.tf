variable "name" {
  description = "Name of the role and instance profile (IAM names are global: include the cluster name)."
  type        = string
}

variable "tls_secret_arns" {
  description = "Secrets Manager ARNs the hosts may read (the TLS PEM files)."
  type        = list(string)
  validation {
    condition     = alltrue([for a in var.tls_secret_arns : can(regex("^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:", a))])
    error_message = "Every entry must be a Secrets Manager secret ARN."
  }
}

variable "tls_kms_key_arns" {
  description = "KMS keys encrypting those secrets, if they use customer-managed keys (empty: AWS-managed key)."
  type        = list(string)
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
}
