require "fileinto";
if header :matches "subject" "*\\*star\\* \\?q" { fileinto "Literal"; }
