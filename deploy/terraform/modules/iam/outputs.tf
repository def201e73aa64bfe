output "instance_profile_name" {
  description = "Instance profile of the host."
  value       = aws_iam_instance_profile.this.name
}

output "role_arn" {
  description = "ARN of the host's role (grant it access to anything else the host needs)."
  value       = aws_iam_role.this.arn
}
