require ["fileinto", "copy"];
keep :copy;
