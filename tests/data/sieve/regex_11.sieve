require ["fileinto","encoded-character"]; fileinto "${hex:zz}x";
