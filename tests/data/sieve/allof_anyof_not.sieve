require "fileinto";
if allof (not exists "list-id", anyof (header :contains "subject" "hello", address :domain "from" "v.example")) { fileinto "Combo"; }
