require ["fileinto","encoded-character"]; fileinto "${hex:4f 72}${unicode:0064}";
