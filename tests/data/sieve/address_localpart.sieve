require "fileinto";
if address :localpart :is ["to","cc"] "me+tag" { fileinto "LP"; }
