require ["fileinto","variables"]; if envelope :all :matches "from" "*@*" { fileinto "${2}"; }
