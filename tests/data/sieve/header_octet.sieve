require "fileinto";
if header :comparator "i;octet" :is "subject" "hello world" { fileinto "Lower"; } elsif header :comparator "i;octet" :is "subject" "Hello world" { fileinto "Exact"; }
