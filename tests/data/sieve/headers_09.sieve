require ["fileinto"]; if exists "X-EMPTY" { fileinto "X"; }
