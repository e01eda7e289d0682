require ["fileinto","variables"]; if header :matches "from" "*" { fileinto "${1}"; }
