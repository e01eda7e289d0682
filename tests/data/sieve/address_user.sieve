require ["fileinto","subaddress"];
if address :user :is ["to","cc"] "me" { fileinto "User"; }
