require "fileinto";
if header :is "x-spam-score" "12" { fileinto "Twelve"; }
