require ["fileinto","variables"]; if address :all :matches "to" "*" { fileinto "A/${1}"; }
