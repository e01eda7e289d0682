require ["fileinto","envelope","variables"]; if envelope :localpart :matches "from" "*" { fileinto "EL/${1}"; }
