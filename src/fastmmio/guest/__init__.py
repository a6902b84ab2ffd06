"""Guest images: paging structures, GDT, boot state and programs, built with iced-x86."""
