require "imap4flags";
addflag;
