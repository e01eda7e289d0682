require ["fileinto","variables","subaddress"]; if address :detail :matches "to" "*" { fileinto "D/${1}"; }
