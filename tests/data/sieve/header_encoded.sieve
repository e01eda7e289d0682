require "fileinto";
if header :contains "subject" "Grüße" { fileinto "Umlaut"; }
if header :contains "from" "Jürgen" { fileinto "Name"; }
