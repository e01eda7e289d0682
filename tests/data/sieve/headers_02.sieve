require ["fileinto"]; if address :is "to" "b+x@g.example" { fileinto "B"; }
