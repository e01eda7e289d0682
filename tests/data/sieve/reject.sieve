require "reject";
if header :contains "subject" "digest" { reject "no lists"; }
