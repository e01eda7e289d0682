require "imap4flags"; setflag "a b c"; removeflag "b"; if hasflag :count "eq" "2" { discard; }
