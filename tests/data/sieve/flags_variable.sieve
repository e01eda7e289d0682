require ["imap4flags","fileinto","variables"];
set "f" "";
addflag "f" "$Work";
if hasflag :contains "f" "work" { fileinto :flags "${f}" "W"; }
