require ["fileinto","envelope","subaddress","variables"];
if envelope :detail :matches "to" "*" { fileinto "Env/${1}"; } else { fileinto "NoDetail"; }
