require ["fileinto","variables"]; if address :localpart :matches "from" "*" { fileinto "L/${1}"; }
