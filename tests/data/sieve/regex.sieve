require ["fileinto","regex","variables"];
if header :regex "subject" "invoice ([0-9]+)" { fileinto "Invoice/${1}"; }
