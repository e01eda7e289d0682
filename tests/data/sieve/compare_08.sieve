require ["fileinto","variables"]; if address :all :matches "from" "*" { fileinto "${1}"; }
