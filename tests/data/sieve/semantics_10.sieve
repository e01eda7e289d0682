require "fileinto"; if header :matches "subject" "hello*" { fileinto "ok"; }
