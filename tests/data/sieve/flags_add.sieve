require ["imap4flags","fileinto"];
addflag "\\Seen";
addflag ["\\Flagged", "$Label1"];
removeflag "$Label1";
fileinto "Flagged";
