require ["imap4flags","fileinto"];
addflag "\\Seen";
if hasflag :is "\\seen" { fileinto "HasSeen"; }
