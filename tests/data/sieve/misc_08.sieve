require ["fileinto","envelope","variables"]; if envelope :all :matches "from" "*@*" { fileinto "${2}"; }
