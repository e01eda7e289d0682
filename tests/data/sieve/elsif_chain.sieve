require "fileinto";
if header :contains "subject" "zzz" { fileinto "Z"; } elsif header :contains "subject" "report" { fileinto "R"; } elsif true { fileinto "T"; } else { fileinto "E"; }
