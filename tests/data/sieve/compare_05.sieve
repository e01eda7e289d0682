require "fileinto"; if header :contains :comparator "i;octet" "subject" "Grü" { fileinto "octcontains"; }
