require ["fileinto","envelope","subaddress"];
if envelope :user "to" "me" { fileinto "EnvUser"; }
