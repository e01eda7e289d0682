require "mailbox"; if mailboxexists "Nope" { discard; }
