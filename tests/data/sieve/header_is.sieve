require "fileinto";
if header :is "subject" "hello world" { fileinto "Hello"; }
