require ["fileinto","copy"];
fileinto :copy "A";
fileinto "A";
redirect :copy "a@v.example";
redirect "a@v.example";
