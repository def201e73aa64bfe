variable "name" {
  description = "Name of the host the role is for (Name tag; the start of the role's and instance profile's names)."
  type        = string
}

variable "secret_arns" {
  description = "Secrets Manager ARNs (or ARN patterns ending in the 6-character suffix wildcard \"-??????\") this host may read."
  type        = list(string)
  validation {
    condition     = alltrue([for a in var.secret_arns : can(regex("^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:[A-Za-z0-9/_+=.@-]+(-\\?\\?\\?\\?\\?\\?)?$", a))])
    error_message = "Every entry must be a Secrets Manager secret ARN of one secret (no '*')."
  }
}

variable "kms_key_arns" {
  description = "KMS keys encrypting those secrets, if they use customer-managed keys (empty: AWS-managed key)."
  type        = list(string)
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
}
