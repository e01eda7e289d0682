require "fileinto";
if header :contains ["subject","to"] ["digest","other"] { fileinto "Hit"; }
