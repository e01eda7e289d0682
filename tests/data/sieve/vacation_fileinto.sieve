require ["vacation","fileinto"];
vacation "away";
fileinto "Read";
