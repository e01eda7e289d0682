require "fileinto";
fileinto "Same";
fileinto "Same";
keep;
fileinto "INBOX";
