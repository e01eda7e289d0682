require ["fileinto","variables"]; if header :matches "subject" "*" { fileinto "S/${1}"; }
