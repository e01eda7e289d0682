require "fileinto";
if true { if false { fileinto "no"; } elsif true { if not false { fileinto "Deep"; } } else { fileinto "no2"; } }
