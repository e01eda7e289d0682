require ["fileinto","subaddress","variables"];
if address :detail :matches ["to","cc","from"] "*" { fileinto "Detail/${1}"; }
