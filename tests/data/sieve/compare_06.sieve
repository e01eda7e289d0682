require "fileinto"; if header :matches "subject" "gr?ße*" { fileinto "qmb"; }
