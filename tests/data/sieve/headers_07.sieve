require ["fileinto"]; if header :is "x-empty" "" { fileinto "E"; }
